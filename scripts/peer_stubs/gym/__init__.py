"""Stand-in for gym (metakernels-peer-stubs): enough for ``import learn2learn``, nothing more."""

from metakernels_peer_stubs import install


def register(env_id, **kwargs):
    """gym.envs.registration.register: learn2learn registers its environments at import; ignored here."""


install(
    "gym",
    "0.0.0+metakernels.stub",
    ["core", "error", "spaces", "utils", "utils.seeding", "envs", "envs.registration", "vector"],
    attrs={"gym.envs": {"register": register}, "gym.envs.registration": {"register": register}},
)
