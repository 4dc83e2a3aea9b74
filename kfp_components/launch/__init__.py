"""Where training runs: the local backend (a torchrun subprocess) or a Kubeflow Trainer TrainJob.

Both run the same command, ``torchrun ... -m kfp_components.trainer --config run.yaml``:

* :mod:`kfp_components.launch.local`: a ``torchrun`` subprocess on this machine (``kfp.local``, the demo).
* :mod:`kfp_components.launch.trainjob`: a TrainJob on the cluster (submit, wait, stream logs, clean up),
  with :mod:`~kfp_components.launch.manifest` (the typed ``TrainJobConfig``, names, the TrainJob for each
  CRD version) and :mod:`~kfp_components.launch.kube` (API clients and credentials).

Import from the submodules: this package imports nothing, so the local backend never loads the Kubernetes
client.
"""
