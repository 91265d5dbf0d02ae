"""Stand-in for torchvision (metakernels-peer-stubs): enough for ``import learn2learn`` and ``import LibMTL``
(whose model zoo imports torchvision.models.utils.load_state_dict_from_url), nothing more."""

from metakernels_peer_stubs import install

install(
    "torchvision",
    "0.0.0+metakernels.stub",
    [
        "transforms",
        "datasets",
        "datasets.folder",
        "datasets.omniglot",
        "models",
        "models.utils",
    ],
)
