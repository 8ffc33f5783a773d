"""gin/index/*.gin: each file parses and configures the index the way it says."""
import gin
import pytest

from atlas_jax import gin_config
from atlas_jax.index import device, hybrid, passage_index, refresh, scann_backend


@pytest.fixture(autouse=True)
def clear_gin():
    """No index binding (e.g. the faiss backend below) is left for later test files."""
    yield
    gin.clear_config(clear_constants=True)


def test_exact_and_compressed():
    gin_config.parse(["index/exact.gin"])
    assert passage_index.IndexConfig().backend == "device"
    assert device.DeviceIndexConfig() == device.DeviceIndexConfig(storage="float32")
    gin_config.parse(["index/compressed.gin"])
    assert device.DeviceIndexConfig().storage == "int4"
    assert device.DeviceIndexConfig().rerank_candidates == 100


def test_scann_hybrid_refresh():
    gin_config.parse(["index/scann.gin", "index/hybrid.gin", "index/refresh_pretrain.gin"])
    config = passage_index.IndexConfig()
    assert config.backend == "scann" and config.hybrid
    assert scann_backend.ScannConfig().mode == "auto"
    assert hybrid.HybridConfig().rrf_k == 60
    schedule = refresh.RefreshSchedule.parse(config.refresh_schedule)
    assert schedule.steps(3001) == [0, 500, 1000, 3000]
    gin_config.parse(["index/refresh_never.gin"])
    assert refresh.RefreshSchedule.parse(passage_index.IndexConfig().refresh_schedule
                                         ).steps(10) == []


def test_bad_backend_binding_is_named():
    gin_config.parse(["index/exact.gin"], ["--gin.passage_index.IndexConfig.backend='faiss'"])
    with pytest.raises(ValueError, match="IndexConfig.backend = 'faiss'"):
        passage_index.IndexConfig()
