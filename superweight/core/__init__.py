"""The science core: scores, selections, perturbations, evaluation and statistics. Never imports wandb,
plotly or the run's file layout."""
