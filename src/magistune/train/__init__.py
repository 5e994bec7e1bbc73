"""The training stage: one recipe per training mode, built from shared components.

Recipes (each reads top to bottom: setup, then the loop, then the outputs):
    sft.py               supervised fine-tuning in one process (one GPU, or the CPU); imports no distributed module
    sft_distributed.py   the same under torchrun, one process per GPU: FSDP2 or DDP (the loop repeated on purpose)
    dpo.py               preference tuning (rl: dpo, ipo, orpo, simpo, kto) in one process, sft.py's structure
    dpo_distributed.py   the same under torchrun, FSDP2 or DDP (the loop repeated, as sft_distributed.py)
    (grpo.py: RL, to come, from the same parts)
launch.py picks the recipe from torchrun's environment (`magistune train`), and builds `--nproc N`'s command.

Components:
    batches.py, packing.py     the data position, micro-batches, steps per epoch, each rank's share, packed rows
    loss.py, offload.py        the token-normalised loss, forward/backward of a step, eval; activation offloading
    optim.py                   optimizers and learning-rate schedules
    checkpoint.py              one-process checkpoints: atomic save (start, commit), checksums, rotation, which to
                               resume, disk space; rng.py: the RNG states as JSON (no pickle anywhere in a checkpoint)
    checkpoint_load.py         resuming one: adapter (or a full model's source), optimizer, scheduler, RNG
    run_dir.py                 output_dir belongs to one run: its lock, an earlier run refused or replaced
    metrics.py                 metrics.jsonl, TensorBoard, loss.png, the progress bar, what each rank prints
    stopping.py                stop signals at step boundaries, non-finite losses, out-of-memory messages
    preflight.py               what is checked before a weight loads: paths, device, seed, the resolved config
    preference_loss.py         DPO/IPO/ORPO/SimPO/KTO losses per pair, summed answer log-probs from hidden states
    preference_step.py         the pair forward: one row per pair (prompt once, rejected blind to chosen), the
                               reference with adapters off, KTO rows and KL, the loss the config names
    preference_ref.py          reference log-probs precomputed before step 1, cached beside the data cache
Multi-GPU components (used by sft_distributed.py and dpo_distributed.py only):
    distributed.py             the process group (Ranks) and the collectives of a step: token normaliser, totals,
                               global gradient norm, eval sharing
    sharding.py                the model sharded (FSDP2) or replicated (DDP) around a loss root
    rank_agreement.py          the ranks' config and data fingerprints, and what differs
    dist_checkpoint.py         sharded checkpoints (DCP), the final output gathered on rank 0, `magistune consolidate`
    preference_ranks.py        dpo_distributed's forwards through the root: losses, KTO's z₀ over the ranks, the
                               reference table computed by every rank, the eval share
"""
