"""``CurvatureCallback``: the Trainer writes a curvature store beside the weights at every save.

::

    from mergekit_ota.training import CurvatureCallback

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[CurvatureCallback()])

At every checkpoint save it writes ``checkpoint-N/exp_avg_sq.safetensors`` (rank-1 by default: an 8B
model's is about 13 MB; ``compress="none"`` writes ``exp_avg_sq.safetensors.index.json`` and its
shards), and at the end of training ``output_dir/exp_avg_sq.safetensors``, so the directory a user
merges carries its curvature even with ``save_only_model=True`` or ``save_total_limit``.  A merge finds
it with no ``curvature:`` line.

How the state is read, per strategy:

* single process, DDP, FSDP2: from the live optimizer (:func:`~mergekit_ota.training.save.save_curvature`;
  every rank takes part in the gathers, rank 0 writes);
* DeepSpeed ZeRO-1/2/3: at a save, from the checkpoint DeepSpeed has just written
  (:mod:`mergekit_ota.export.zero`, rank 0 alone, no collective), so the store is exactly
  ``mergekit-ota export``'s; at the end of training, from the newest checkpoint if it holds the final
  step, else live (``safe_get_full_optimizer_state``) where DeepSpeed can answer for every parameter,
  else a warning that the final directory has no store (the newest checkpoint's store remains).

Failures are logged, never raised into the training loop: a lost store must not cost the run.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, List, Optional

from transformers import TrainerCallback

from mergekit_ota.errors import OTAError
from mergekit_ota.export.lora import open_lora_zero
from mergekit_ota.export.model_params import model_parameters
from mergekit_ota.export.options import ExportOptions
from mergekit_ota.export.pipeline import write_store
from mergekit_ota.export.zero import find_step_dir, open_zero
from mergekit_ota.store_format import DEFAULT_STORE_NAME, INDEX_SUFFIX
from mergekit_ota.training.gather import is_deepspeed, rank
from mergekit_ota.training.peft_live import peft_model
from mergekit_ota.training.save import agree, save_curvature

LOG = logging.getLogger("mergekit_ota")


class CurvatureCallback(TrainerCallback):
    """Write the curvature store into every ``checkpoint-N/`` and, at the end, into ``output_dir``.

    ``compress``: ``"rank1"`` (default) or ``"none"``; ``dtype``: ``"float32"`` or ``"bfloat16"``;
    ``at_end``: also write into ``output_dir`` when training ends.  ``seconds`` lists the wall time of
    each write (rank 0), for measuring the overhead.
    """

    def __init__(self, compress: str = "rank1", dtype: str = "float32", at_end: bool = True):
        ExportOptions.parse(compress=compress, dtype=dtype)  # refuse bad settings when the callback is built
        self.compress, self.dtype, self.at_end = compress, dtype, at_end
        self.seconds: List[float] = []
        self.written: List[str] = []

    def _out(self, directory: str) -> str:
        name = DEFAULT_STORE_NAME if self.compress == "rank1" else DEFAULT_STORE_NAME + INDEX_SUFFIX
        return os.path.join(directory, name)

    def _from_checkpoint(self, checkpoint: str, out: str, model: Any) -> None:
        """DeepSpeed: export the ZeRO checkpoint just saved (rank 0 only); a PEFT adapter's with its base model's
        parameters taken from the live model's config (export's ``--model``)."""
        if rank() != 0:
            return
        options = ExportOptions.parse(compress=self.compress, dtype=self.dtype, force=True)
        adapter = peft_model(model)
        if adapter is None:
            source = open_zero(checkpoint, None)
        else:
            base = model_parameters(adapter.get_base_model().config, "the live model's base config")
            source = open_lora_zero(checkpoint, None, params=base)
        write_store(source, out, options)

    def _write(self, model: Any, optimizer: Any, directory: str, what: str, checkpoint: Optional[str]) -> None:
        out = self._out(directory)
        started = time.perf_counter()
        try:
            if checkpoint is not None:
                self._from_checkpoint(checkpoint, out, model)
            else:
                save_curvature(model, optimizer, out, compress=self.compress, dtype=self.dtype, force=True)
        except (OTAError, OSError) as error:
            if rank() == 0:
                LOG.warning("mergekit-ota: no curvature store for %s: %s", what, error)
            return
        if rank() == 0:
            self.seconds.append(time.perf_counter() - started)
            self.written.append(out)
            LOG.info("mergekit-ota: wrote %s (%s) in %.2f s", out, self.compress, self.seconds[-1])

    def on_save(
        self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kwargs: Any
    ) -> None:
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        deepspeed = is_deepspeed(model)
        # Only rank 0 writes the checkpoint (other ranks may look before it exists): rank 0 decides, every rank follows,
        # or a rank skipping the gathers would leave the others waiting in them.
        if not agree(os.path.isdir(checkpoint) if rank() == 0 else True):
            return  # a save that wrote no checkpoint directory (e.g. another run dir under hyperparameter search)
        source = None
        if deepspeed:  # rank 0 alone reads the saved checkpoint: no collective, so the others are done
            if rank() != 0:
                return
            source = find_step_dir(checkpoint)
            if source is None:
                LOG.warning(
                    "mergekit-ota: %s has no DeepSpeed optimizer files (save_only_model?); no store", checkpoint
                )
                return
        self._write(model, optimizer, checkpoint, checkpoint, source)

    def on_train_end(
        self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kwargs: Any
    ) -> None:
        if not self.at_end or model is None or optimizer is None:
            return
        if not is_deepspeed(model):
            self._write(model, optimizer, args.output_dir, f"{args.output_dir} (end of training)", None)
            return
        final = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        source = find_step_dir(final) if rank() == 0 and os.path.isdir(final) else None
        # from the final checkpoint when one holds the last step (rank 0 decides for all: the live path gathers),
        # else live (which ZeRO-1/2 may refuse: logged)
        if agree(source is None if rank() == 0 else True):
            self._write(model, optimizer, args.output_dir, f"{args.output_dir} (end of training)", None)
        elif rank() == 0:
            self._write(model, optimizer, args.output_dir, f"{args.output_dir} (end of training)", source)
