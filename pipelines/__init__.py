"""Compiled Kubeflow pipelines. Installed as ``kfp_components.pipelines``; run from the repository root
as ``pipelines``: ``python -m pipelines.training.osft.pipeline`` writes ``pipelines/training/osft/pipeline.yaml``.
"""
