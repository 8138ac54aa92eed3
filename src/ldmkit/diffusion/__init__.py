"""Diffusion math as pure tensor functions: schedule, loss, samplers. No nn.Module here."""
