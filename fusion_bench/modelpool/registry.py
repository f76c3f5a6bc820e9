"""Registry of specialised model pool classes, chosen by ``modelpool.type``."""

from fusion_bench.registry import Registry

MODELPOOLS = Registry("modelpool.type", "fusion_bench.modelpool")
register_modelpool = MODELPOOLS.register


def get_modelpool_class(name: str) -> type:
    return MODELPOOLS.get(name)
