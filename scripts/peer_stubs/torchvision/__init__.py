"""Stand-in for torchvision (metakernels-peer-stubs): enough for ``import learn2learn``, nothing more."""

from metakernels_peer_stubs import install

install("torchvision", "0.0.0+metakernels.stub", ["transforms", "datasets", "datasets.folder", "datasets.omniglot"])
