"""Checks that need a CUDA GPU: skipped elsewhere, run on a GPU machine with `make gpu-check`.

CI has no GPU, so the CUDA-only code (nvJPEG decode, fp16 inference, bf16 autocast
training, VRAM probes) is exercised here on the offline kit, against the CPU path.
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run `make gpu-check` on one)"),
]


@pytest.fixture(scope="module")
def cuda_lab(kit, tmp_path_factory):
    from clip_utils.lab import Lab

    return Lab(model=str(kit["model"]), data_root=kit["data"], results_dir=tmp_path_factory.mktemp("cuda"),
               device="cuda", batch_size=64)


def test_gpu_decode_path_agrees_with_the_cpu_pil_path(tiny_clip, kit):
    from clip_utils.data import load_dataset
    from clip_utils.model.features import encode_paths
    from clip_utils.model.preprocess import Preprocess

    model, processor = tiny_clip
    pre = Preprocess.from_processor(processor)
    paths = [p for p, _ in load_dataset("flowers102", kit["data"], "val").samples]
    cpu = encode_paths(model, paths, pre, "cpu", fast=False, num_workers=0, desc=None)
    gpu_model = model.to("cuda", torch.float16)
    try:
        gpu = encode_paths(gpu_model, paths, pre, "cuda", desc=None)  # default on CUDA: nvJPEG + fp16
    finally:
        model.to("cpu", torch.float32)
    assert (cpu * gpu).sum(-1).min() > 0.98
    g = torch.Generator().manual_seed(0)
    classes = torch.nn.functional.normalize(torch.randn(cpu.shape[1], 102, generator=g), dim=0)
    assert ((cpu @ classes).argmax(1) == (gpu @ classes).argmax(1)).float().mean() >= 0.99


def test_gpu_decode_is_intact_while_the_gpu_is_still_busy(tmp_path):
    """nvJPEG writes from a private stream: its outputs must never reuse memory that work
    still queued on the consumer's stream writes to (pytorch/vision#9606)."""
    import io

    import numpy as np
    from PIL import Image

    from clip_utils.model.inputs import decode_batch

    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(8):  # 400x400x3 = 480 kB decoded: the same block size as the buffers freed below
        buf = io.BytesIO()
        Image.fromarray(rng.integers(40, 215, (400, 400, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
    names = [f"img{i}.jpg" for i in range(len(blobs))]
    torch.cuda.synchronize()
    reference = [img.cpu() for img in decode_batch(blobs, names, torch.device("cuda"))]  # decoded on an idle GPU
    x = torch.randn(4096, 4096, device="cuda")
    y = torch.empty_like(x)
    for _ in range(10):
        busy = [torch.empty(3 * 400 * 400, dtype=torch.uint8, device="cuda") for _ in blobs]
        for _ in range(20):  # keep the GPU busy, so the writes below are still queued when freed
            torch.mm(x, x, out=y)
        for b in busy:
            b.fill_(0)
        del b, busy  # freed now; their zero-fills run later
        images = decode_batch(blobs, names, torch.device("cuda"))
        torch.cuda.synchronize()
        for image, ref in zip(images, reference, strict=True):
            assert torch.equal(image.cpu(), ref)  # the same decoder, so the same bytes


def test_gpu_decode_of_grey_cmyk_and_png_matches_the_cpu(tmp_path):
    """CUB has greyscale JPEGs; CMYK and PNG files must fall back, never decode to wrong colours."""
    import io

    import numpy as np
    from PIL import Image

    from clip_utils.model.inputs import decode_batch

    # A smooth picture, saved without chroma subsampling: nvJPEG and libjpeg upsample chroma
    # differently (with and without interpolation), which is not what this test is about.
    ramp = np.linspace(0, 255, 80, dtype=np.float32)
    pixels = np.stack([np.tile(ramp, (60, 1)), np.tile(ramp[::-1], (60, 1)), np.full((60, 80), 120.0)], -1)
    rgb = Image.fromarray(pixels.astype(np.uint8))
    blobs = []
    for image, fmt in ((rgb, "JPEG"), (rgb.convert("L"), "JPEG"), (rgb.convert("CMYK"), "JPEG"), (rgb, "PNG")):
        buf = io.BytesIO()
        image.save(buf, format=fmt, **({"subsampling": 0, "quality": 95} if fmt == "JPEG" else {}))
        blobs.append(buf.getvalue())
    names = ["rgb.jpg", "grey.jpg", "cmyk.jpg", "rgb.png"]
    cpu = decode_batch(blobs, names, torch.device("cpu"))
    gpu = decode_batch(blobs, names, torch.device("cuda"))
    for name, a, b in zip(names, cpu, gpu, strict=True):
        assert b.device.type == "cuda" and a.shape == b.shape == (3, 60, 80), name
        assert (a.float() - b.cpu().float()).abs().mean() < 3, name


def test_zeroshot_probe_lora_and_predict_on_cuda(cuda_lab, capsys):
    from clip_utils.app.photos import predict_photos
    from clip_utils.config import LoraSettings, TrainConfig
    from clip_utils.methods.lora import run_lora
    from clip_utils.methods.probe import run_probe
    from clip_utils.methods.zeroshot import run_zeroshot

    lab = cuda_lab.replace()  # nothing loaded yet: this test counts the loads
    zs = run_zeroshot(lab, "cub200", ["domain"])["domain"]
    probe = run_probe(lab, "cub200", TrainConfig(epochs=3, lr=5e-3), solver="adamw")  # the loop on the GPU
    lora = run_lora(lab, "cub200", TrainConfig(epochs=2, lr=5e-4, augment=True), LoraSettings())
    for metrics in (zs, probe, lora):
        assert math.isfinite(metrics["top1"])
    assert probe["top1"] > 5 / len(probe["class_names"])  # learns on the GPU too
    assert zs["peak_vram_mb"] > 0 and probe["peak_vram_mb"] > 0 and lora["peak_vram_mb"] > 0
    for method in ("zeroshot", "probe", "lora"):
        result = predict_photos(lab, ["my_photo/flower.png", "my_photo/bird.jpg"], "cub200", method=method)
        assert all("top_k" in r for r in result), result
    # fp16 inference, bf16 LoRA training and its fp16 test and photo classifiers: copies of one read
    loads = [line for line in capsys.readouterr().err.splitlines() if line.startswith("loaded ")]
    assert len(loads) == 1, loads


def test_lora_grad_checkpointing_reduces_peak_memory_on_cuda(cuda_lab):
    from clip_utils.config import LoraSettings, TrainConfig
    from clip_utils.lab import Lab
    from clip_utils.methods.lora import run_lora

    peaks = {}
    for ckpt in (False, True):
        lab = Lab(model=cuda_lab.model, data_root=cuda_lab.data_root, device="cuda",
                             results_dir=cuda_lab.results_dir / f"ckpt{int(ckpt)}", batch_size=64)
        peaks[ckpt] = run_lora(lab, "cub200", TrainConfig(epochs=1, augment=True),
                               LoraSettings(grad_checkpointing=ckpt))["peak_vram_mb"]
    assert peaks[True] < peaks[False]


def test_lora_on_both_encoders_measures_memory_and_exports_on_cuda(cuda_lab, tmp_path):
    """Both towers in bf16 with fp32 adapters, CLIP's own classifier, the VRAM probe, then an fp32 merge."""
    from clip_utils.app.export import export_classifier, predict_exported
    from clip_utils.config import LoraSettings, TrainConfig
    from clip_utils.methods.lora import run_lora

    lab = cuda_lab.replace(results_dir=cuda_lab.results_dir / "both")
    metrics = run_lora(lab, "cub200", TrainConfig(epochs=2, lr=5e-4, augment=True),
                       LoraSettings(encoders="both", targets=("q_proj", "k_proj", "v_proj"), grad_checkpointing=True))
    assert math.isfinite(metrics["top1"]) and metrics["peak_vram_mb"] > 0
    folder = export_classifier(lab, "cub200", "lora", tmp_path / "both")
    result = predict_exported(folder, ["my_photo/bird.jpg"], device="cuda")
    assert "top_k" in result[0], result


def test_benchmark_runs_on_cuda(capsys):
    from clip_utils.app import bench

    assert bench.main(["--small", "--images", "64", "--device", "cuda"]) == 0
    assert "model alone" in capsys.readouterr().out


def test_coop_and_base2new_on_cuda(cuda_lab):
    """CoOp's float32 text tower under autocast, and base-to-new's new-class scoring (CoOp's
    prompts, LoRA merged in fp16 on the GPU) against the same scores on the CPU."""
    from clip_utils import registry
    from clip_utils.app.base2new import run_base2new
    from clip_utils.methods.cached import CachedSettings
    from clip_utils.methods.coop import REFERENCE_PROMPTS

    lab = cuda_lab.replace()
    coop = registry.get("coop").run(lab, "cub200", CachedSettings(REFERENCE_PROMPTS, {"epochs": 3, "n_ctx": 4}),
                                    shots=2, seed=1)
    assert math.isfinite(coop["top1"]) and coop["peak_vram_mb"] > 0
    result = run_base2new(lab, "cub200", ["coop", "lora", "tip_adapter"], shots=2, seeds=(1,))
    by_method = {r["method"]: r for r in result.summary}
    assert all(math.isfinite(by_method[m]["new"]) for m in ("coop", "lora", "tip_adapter"))
    base, new = (lab.resolve("cub200").subset(range(10), "base"), lab.resolve("cub200").subset(range(10, 20), "new"))
    cpu = lab.replace(device="cpu")
    for method in ("coop", "lora"):
        run = {"prompt_set": None}
        gpu_scores = registry.get(method).score_new(lab, base, new, shots=2, seed=1, run=run).float().cpu()
        cpu_scores = registry.get(method).score_new(cpu, cpu.resolve(base), cpu.resolve(new), shots=2, seed=1,
                                                    run=run).float()
        agree = (gpu_scores.argmax(1) == cpu_scores.argmax(1)).float().mean().item()
        assert agree > 0.9, (method, agree)
