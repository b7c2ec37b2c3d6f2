"""Where results leave the process: files in out_dir, plots, figures, W&B tracking and sweeps."""
