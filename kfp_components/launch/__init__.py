"""Where training runs: the local backend (a torchrun subprocess) or a Kubeflow Trainer TrainJob."""
