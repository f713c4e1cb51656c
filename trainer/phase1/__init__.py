"""Phase 1: the frozen encoders + aligner, behind one contract with four sources.

- bundle   the project's bundle format; the demo bundle (zero set-up) is one
- hf       Hugging Face encoders from local dirs + your aligner (trainer.phase1.hf)
- factory  your code, "pkg.module:build" (trainer.phase1.source.import_factory)
- features precomputed aligned features (trainer.phase1.features_file)

The contract (raw media in, aligned features and mask out) is in trainer.phase1.contract;
`python -m trainer.phase1 export CONFIG OUT` writes a features file from any source.
"""
