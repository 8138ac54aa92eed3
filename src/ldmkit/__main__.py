from ldmkit.cli import main

raise SystemExit(main())
