"""Convert a torchvision ResNet checkpoint into the GGUF file the runtime loads.

    python -m pyggml_resnet.convert CHECKPOINT OUTPUT.gguf [--arch resnet101] [--dtype f32|f16|bf16|q8_0]
                                    [--weights IMAGENET1K_V2] [--labels FILE] [--resize N|H,W|none]
                                    [--crop N|H,W|none] [--mean M M M] [--std S S S]
                                    [--interpolation bilinear] [--no-antialias] [--force]

Inputs (recognised by their content, whatever the file is called):

* a PyTorch ``.pth``/``.pt``/``.ckpt`` file holding a ``state_dict``: plain, or under ``"state_dict"`` (PyTorch
  Lightning), ``"model_state_dict"`` (the PyTorch tutorial) or ``"model"``, its names prefixed or not by
  wrappers (DataParallel's ``module.``, torch.compile's ``_orig_mod.``, a LightningModule's attribute such as
  ``model.``). It is read with ``torch.load(weights_only=True)`` only, so a checkpoint can never run code:
  anything that is not plain tensors and containers is refused, a whole pickled model (``torch.save(model)``)
  with the advice to save its ``state_dict``.
* a ``.safetensors`` file (timm's and Hugging Face's format), read with the ``safetensors`` package.
* a GGUF model file of ours, to write again in another ``--dtype``; its weights name, labels and preprocessing
  are kept unless the options replace them.
* a timm model directory as the Hugging Face Hub has it (``config.json`` and ``model.safetensors`` or
  ``pytorch_model.bin``): its weights, with the eval transform, tag and labels ``config.json`` records
  (`timm`).
* the legacy headerless ``.bin`` of the C++ ResNet-101 example this project started from (recognised by its
  int32 magic 0x67676d6c, whatever the file is called): one record per state_dict entry, in order, each an
  int32 n_dims, n_dims int32 dims in ggml (reversed) order and raw float32 data, every tensor ``.squeeze()``d.
  It has no names, so the architecture is recognised from the record count and shapes (or given by --arch).

Any torchvision ResNet converts: resnet18..152, Wide ResNets and ResNeXts (groups and width per group are read
off the first block's 3x3 conv), and timm's ResNets that keep torchvision's layout (``resnet50.a1_in1k`` and the
other plain-stem ``resnet*``, ``wide_resnet*``, ``resnext*`` weights). timm's variants that add layers (the deep
stem and average-pool shortcut of ResNet-D, squeeze-excitation, attention, blur pools, GroupNorm) are refused
with a message naming what is unsupported. timm evaluates its weights with other preprocessing than
torchvision's: a timm directory records it; for bare weights give it with ``--resize/--crop/--interpolation``
(docs/usage.md lists the common values), as for a fine-tuned model trained with its own transforms
(``--resize 224,224 --crop none --mean 0.5 0.5 0.5 --std 0.5 0.5 0.5``; `arch.Preprocessing` in Python).

Output: a GGUF file (architecture ``resnet``) with the config, class labels and preprocessing as metadata
(keys in ``arch.Key``) and one tensor per inference tensor, under its torchvision name, in state_dict order.
Shapes are written in PyTorch order and reversed by the writer, as GGUF stores ggml order.

Storage types (``--dtype``). BatchNorm vectors and fc.bias are always f32. For the conv and fc weights:

* ``f32``, ``f16``, ``bf16``: that type, in the PyTorch shape (4-D convs, 2-D fc).
* ``q8_0``: ggml quantizes in blocks of 32 along ne0, the LAST PyTorch axis. A conv weight is therefore
  stored flattened to 2-D ``(OC, IC*KH*KW)`` (PyTorch's row-major flatten of the 4-D weight) when
  ``IC*KH*KW`` is a multiple of 32, and otherwise (the 7x7 stem: 3*7*7 = 147) kept f32 and 4-D.
  fc.weight is q8_0 when its in-features are a multiple of 32, else f32.

So a loader must accept a conv weight either 4-D ``(OC, IC, KH, KW)`` or flattened 2-D ``(OC, IC*KH*KW)``.

Reading and writing are separate steps: `read_checkpoint` gives a checked `Checkpoint` (or `Checkpoint.of`
makes one from arrays), and `write_gguf` writes one; `convert` does both.

The output is written to a temporary file beside it and renamed into place, so a failed or interrupted
conversion never leaves a partial file behind or touches an existing one. The output may not be the input
(under any name: a symlink or hard link to it is refused too), and an existing file that is not a GGUF file
is replaced only with ``--force``.

The package's files are these steps: `readers` (checkpoint files), `timm` (a timm Hub directory), `legacy` (the ``.bin``), `checkpoint`
(the checked `Checkpoint`), `write` (the GGUF writer, and `convert`) and `cli` (the command line).
"""

from .checkpoint import Checkpoint, check_state
from .cli import main
from .legacy import LEGACY_MAGIC
from .readers import GGUF_MAGIC, read_checkpoint
from .write import BN_EPS, DTYPES, convert, write_gguf

__all__ = ["BN_EPS", "DTYPES", "GGUF_MAGIC", "LEGACY_MAGIC", "Checkpoint", "check_state", "convert", "main",
           "read_checkpoint", "write_gguf"]
