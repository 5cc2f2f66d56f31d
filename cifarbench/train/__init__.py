"""The training layer: models, data, the LightningModule, fit, and the job a node runs. The only layer that
imports torch; ``cifarbench.train.job`` does so lazily, so that submitting can name the job class."""
