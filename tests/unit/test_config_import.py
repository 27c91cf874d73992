"""`clipjob config from-corenet`: CoreNet CLIP YAML -> clipjob config (tests/corenet_recipe.py holds the YAML; the
command itself runs in tests/integration/test_cli_errors.py)."""

import pytest
import yaml

from clipjob.config_import import import_corenet, make_divisible, multiscale_sizes
from clipjob.errors import ConfigError
from corenet_recipe import VIT_B16


def test_should_map_the_corenet_vit_b16_recipe():
    cfg, ignored = import_corenet(yaml.safe_load(VIT_B16))
    m, t, d, tr = cfg.model, cfg.train, cfg.data, cfg.train
    assert (m.vision.family, m.vision.width, m.vision.layers, m.vision.heads, m.vision.patch_size,
            m.vision.image_size, m.vision.ln_eps, m.vision.act) == ("corenet", 768, 12, 12, 16, 224, 1e-6, "gelu")
    assert (m.text.width, m.text.layers, m.text.heads, m.text.context_length, m.text.vocab_size, m.text.ln_eps) == \
        (512, 12, 8, 77, 49408, 1e-5)
    assert m.embed_dim == 512 and m.range_augment and m.grad_checkpointing
    assert (tr.steps, tr.batch_size, tr.lr, tr.min_lr, tr.warmup_steps, tr.warmup_init_lr) == \
        (200_000, 256, 1e-3, 1e-6, 10_000, 1e-6)
    assert (tr.betas, tr.eps, tr.weight_decay, tr.ema_momentum, tr.precision, tr.ckpt_every_steps, tr.loss) == \
        ((0.9, 0.98), 1e-6, 0.2, 0.0005, "fp16", 5000, "clip")
    assert d.multiscale and d.multiscale_sizes == [160, 192, 224, 256, 288, 320] and d.rrc_scale == (0.9, 1.0)
    assert cfg.eval.data == "imagenet:/mnt/vision_datasets/imagenet/validation" and cfg.eval.resolution == 0
    assert set(ignored) == {"taskname", "common.run_label", "common.save_all_checkpoints", "dataset.root_train",
                            "dataset.name", "dataset.val_batch_size0", "dataset.workers",
                            "sampler.use_shards", "model.layer.global_pool", "model.layer.conv_init",
                            "model.layer.linear_init", "model.layer.linear_init_std_dev", "stats.val",
                            "stats.checkpoint_metric"}


def test_should_map_the_vit_h16_variant_and_bf16():
    data = yaml.safe_load(VIT_B16)
    data["model"]["classification"]["vit"]["mode"] = "huge"
    data["model"]["text"]["transformer"].update(model_dim=768, n_heads_per_layer=12)
    data["common"]["mixed_precision_dtype"] = "bfloat16"
    data["ema"]["enable"] = False
    cfg, _ = import_corenet(data)
    assert (cfg.model.vision.width, cfg.model.vision.layers, cfg.model.vision.heads) == (1280, 32, 20)
    assert (cfg.model.text.width, cfg.model.text.heads, cfg.train.precision, cfg.train.ema_momentum) == (768, 12, "bf16", 0.0)


def test_should_refuse_every_key_that_changes_the_result_and_clipjob_does_not_implement():
    data = yaml.safe_load(VIT_B16)
    data["model"]["learn_augmentation"]["noise"] = False  # partial RangeAugment: not expressible
    data["model"]["text"]["transformer"]["dropout"] = 0.1
    data["optim"]["name"] = "sgd"
    with pytest.raises(ConfigError) as e:
        import_corenet(data)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("CoreNet config: 5 key(s) would change what is trained")  # + brightness, contrast
    for key in ("model.learn_augmentation.noise=False", "model.text.transformer.dropout=0.1", "optim.name='sgd'"):
        assert key in msg, msg


@pytest.mark.parametrize("path, value", [
    (("model", "activation", "name"), "relu"),  # would still build GELU
    (("model", "text", "transformer", "causal_masking"), False),  # would still build a causal mask
    (("scheduler", "max_iteration"), 1000),  # misspelled: steps would stay at the default
    (("dataset", "multi_modal_img_text", "trunc_seq_len"), True),  # not emulated
])
def test_should_refuse_a_meaning_changing_value_in_one_line(path, value):
    data = yaml.safe_load(VIT_B16)
    node = data
    for p in path[:-1]:
        node = node.setdefault(p, {})
    node[path[-1]] = value
    with pytest.raises(ConfigError, match=rf"1 key\(s\) would change what is trained .*{'.'.join(path)}={value!r}"):
        import_corenet(data)


def test_should_accept_result_neutral_keys_and_clipjob_equal_values():
    data = yaml.safe_load(VIT_B16)
    data["dataset"].update(root_train="/data/train", pin_memory=False, prefetch_factor=4,
                           multi_modal_img_text={"trunc_seq_len": False})
    data["common"]["results_loc"] = "/results"
    data["ddp"] = {"backend": "nccl", "dist_port": 30786}
    _, ignored = import_corenet(data)
    assert {"dataset.root_train", "dataset.pin_memory", "dataset.prefetch_factor", "common.results_loc",
            "ddp.backend", "ddp.dist_port"} <= set(ignored)
    assert "dataset.multi_modal_img_text.trunc_seq_len" not in ignored  # the value clipjob implements: mapped


def test_should_compute_corenet_multiscale_resolutions():
    assert [make_divisible(v, 32) for v in (160, 200, 240, 280, 320, 224)] == [160, 192, 256, 288, 320, 224]
    assert multiscale_sizes(224, 160, 320, 5, 32) == [160, 192, 224, 256, 288, 320]
    assert multiscale_sizes(256, 128, 384, 3, 32) == [128, 256, 384]


def test_should_refuse_an_unknown_vit_mode_in_one_line():
    data = yaml.safe_load(VIT_B16)
    data["model"]["classification"]["vit"]["mode"] = "gigantic"
    with pytest.raises(ConfigError, match="model.classification.vit.mode: 'gigantic' is not one of"):
        import_corenet(data)
