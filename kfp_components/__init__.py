"""kfp-components: Kubeflow Pipelines components, pipelines and a training engine for fine-tuning LLMs."""

__version__ = "0.1.0"
