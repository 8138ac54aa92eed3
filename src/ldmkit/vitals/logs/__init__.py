"""One reader per log format: ldmkit's own ``metrics.jsonl`` (written and read in
``metrics_jsonl``), TensorBoard, W&B, MLflow and CSV (``formats``, ``wandb_files``), mapped onto
the guide's tags per trainer (``trainers``) and dispatched by path (``readers``)."""
