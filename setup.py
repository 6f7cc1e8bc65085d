"""dmd-jax: Distribution Matching Distillation (DMD, DMD2) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="dmd_jax",
    version="0.1.0",
    description="One-step diffusion distillation (DMD / DMD2) in JAX and Flax, sharded with jit + Mesh.",
    packages=find_packages(include=["dmd_jax", "dmd_jax.*"]),
    package_data={"dmd_jax": ["assets/*"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10,<0.13",
        "flax>=0.12,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        "etils[epath]>=1.7",
        "ml-collections>=1.0,<2",
        "tensorboardX>=2.6,<3",
        "tensorflow-datasets>=4.9.8,<5",
        "array-record>=0.7",
        "absl-py>=2.1",
        "numpy>=1.26",
        "scipy>=1.13",
        "pillow>=10",
        "safetensors>=0.4",
    ],
    extras_require={
        # torch (CPU, 2.13.0) and the PyTorch reference packages are used only as parity references.
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "torch==2.13.0",
            "diffusers>=0.40",
            "transformers>=5",
            # gs:// workdirs against a local Cloud Storage emulator (tests/test_gcs_workdir.py); the test
            # helper extends the emulator's request handling, hence the exact version.
            "etils[epath-gcs]",
            "google-cloud-storage>=2",
            "gcp-storage-emulator==2026.7.19",
            "scikit-learn>=1.3",
            # diffusers' LoRA loading (load_lora_weights) of exported LoRA generators (tests/test_lora.py)
            "peft>=0.15",
            # libtpu: the TPU compiler, for compile-only plans of TPU slices on this CPU (dmd_jax/plan.py,
            # tests/test_plan.py, tests/test_splash_attention.py); JAX's default backend stays the CPU.
            "jax[tpu]>=0.10,<0.13",
        ],
        # configs/digits.py: scikit-learn's 8x8 digits (shipped inside its wheel; nothing is downloaded).
        "digits": ["scikit-learn>=1.3"],
        # bench/digits.py --plot: the study's FID curves
        "bench": ["matplotlib>=3.8"],
        # Stable Diffusion teachers (configs/coco.py): the CLIP tokenizer (no torch needed).
        "sd": ["transformers>=5"],
        # gs:// workdirs, converted networks and datasets: etils.epath's Cloud Storage backend (gcsfs), and
        # google-cloud-storage, which Orbax imports itself for gs:// checkpoint folders (docs/gcs.md).
        "gcs": ["etils[epath-gcs]", "google-cloud-storage>=2"],
        "tpu": ["jax[tpu]>=0.10,<0.13"],
        "cuda": ["jax[cuda12]>=0.10,<0.13"],
    },
)
