"""flannelpy: the flannel container overlay network, rebuilt in Python around a compiled data path."""

__version__ = "0.1.0"
