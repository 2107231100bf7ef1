"""syncd: put reviewed datasets and model weights from Artifactory onto an NFS export, driven by git.

Control flow: ``cli → config → reconcile → {gitsource, manifest, plan, fetch, publish, ledger}``.
"""

__version__ = "0.1.0"
