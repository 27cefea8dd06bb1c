"""Evaluation: standard metrics and the ``stepdistill eval`` harness.

* :mod:`.fid` -- FID / KID with torch-fidelity's Inception-v3 from local weights (never downloaded);
* :mod:`.clip_score` -- CLIP score (x100) with open_clip from local weights;
* :mod:`.digits_eval` -- ``stepdistill eval MODEL_DIR --suite digits``: student vs teacher vs training-free solvers;
* :mod:`.teacher_ref` -- teacher names (``digits:sd``, folders) recorded at export and resolved at evaluation.

Submodules are imported on demand (torchmetrics and open_clip are slow to import).
"""
