"""A checkpoint written before a config field existed still resumes while the field holds
its default, and an old run directory's ``run.amp: false`` still loads."""

from __future__ import annotations

import pytest

from tolaria.config import TolariaConfig, load_config
from tolaria.errors import ConfigError, RunMismatch
from tolaria.fingerprint import RunFingerprint
from tolaria.hosts import build_host


def _fingerprint(config, tiny_data):
    model = build_host(config.model, tiny_data.input_shape, tiny_data.num_classes)
    return RunFingerprint(config, tiny_data, model)


def test_a_field_the_checkpoint_predates_matches_at_its_default_only(tiny_data):
    saved = _fingerprint(TolariaConfig(), tiny_data).state_dict()
    saved.pop("optimizer.accumulate_batches")  # written by a Tolaria without the field
    _fingerprint(TolariaConfig(), tiny_data).load_state_dict(saved)
    changed = TolariaConfig()
    changed.optimizer.accumulate_batches = 2
    with pytest.raises(RunMismatch, match=r"optimizer\.accumulate_batches"):
        _fingerprint(changed, tiny_data).load_state_dict(saved)


def test_an_old_run_directorys_amp_false_loads_and_amp_true_names_its_replacement():
    assert load_config(None, ["run.amp=false"]).run.precision == "fp32"
    with pytest.raises(ConfigError, match=r"replaced by run\.precision"):
        load_config(None, ["run.amp=true"])


def test_an_old_run_directorys_default_plateau_loads_and_another_names_its_replacement():
    assert load_config(None, ["tamiyo.plateau_min_delta=0.05"]).tamiyo.plateau_min_improvement \
        == 0.05
    with pytest.raises(ConfigError, match=r"replaced by tamiyo\.plateau_min_improvement \(a "
                                          r"fraction of the best validation loss"):
        load_config(None, ["tamiyo.plateau_min_delta=0.2"])
