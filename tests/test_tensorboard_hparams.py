"""TensorBoard gets the run's config as text and its hyperparameters as an HParams session in its own run."""

from __future__ import annotations

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata

from marginlab.logging.hparams import flat_hparams


def test_config_text_and_hparams_session_are_in_the_run_event_files(run_train, metrics):
    code, run_dir = run_train(
        "trainer.epochs=1",
        "trainer.checkpoint=false",
        "logger.figures=false",
        "logger.probe_max_samples=64",
        "head=arcface",
        "m=0.3",
        "s=16",
        "optim.lr=0.05",
    )
    assert code == 0
    assert list((run_dir / "tensorboard").glob("*/events.out.tfevents.*")) == []  # no sub-run per call
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    assert set(tags) == {metadata.SESSION_START_INFO_TAG, metadata.SESSION_END_INFO_TAG}  # no experiment: inferred
    start = metadata.parse_session_start_info_plugin_data(tags[metadata.SESSION_START_INFO_TAG])
    values = {k: (v.string_value or v.number_value or v.bool_value) for k, v in start.hparams.items()}
    assert values["head"] == "arcface" and values["dataset"] == "digits" and values["backbone"] == "digits_cnn"
    assert values["head.m"] == 0.3 and values["head.s"] == 16 and values["optim.lr"] == 0.05
    assert "logger.tensorboard" not in values and "dataset.root" not in values
    best_key = "best/" + metrics[0](run_dir)["best_metric"]
    assert best_key in acc.Tags()["scalars"] and "test/acc" in acc.Tags()["scalars"]  # the dashboard's metrics
    (text,) = [t for t in acc.Tags()["tensors"] if t.startswith("config")]
    assert b"m: 0.3" in acc.Tensors(text)[0].tensor_proto.string_val[0]


def test_flat_hparams_keeps_scalars_and_names_groups():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {
            "seed": 1,
            "head": {"_target_": "marginlab.heads.arcface.ArcFaceHead", "m": 0.5, "partial_fc": {"sample_rate": None}},
            "dataset": {"root": "/x", "image_size": [28, 28]},
            "logger": {"tensorboard": True},
        }
    )
    assert flat_hparams(cfg) == {"seed": 1, "head": "ArcFaceHead", "head.m": 0.5, "dataset.image_size": "[28, 28]"}
    assert flat_hparams(cfg, {"head": "arcface", "hydra/help": "x"})["head"] == "arcface"
