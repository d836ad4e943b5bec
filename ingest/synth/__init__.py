"""A seeded synthetic corpus of real NWB files in the public Allen layouts, with known ground truth.

    from ingest.synth import synthesize, SynthConfig
    paths = synthesize(out_dir, sessions=6, seed=0, ophys_format="nwb2", config=SynthConfig(duration_s=300))

Modules: :mod:`.generative` (generative model, ground truth files, optimal decoder), :mod:`.schedule`
(Allen-like stimulus schedule), :mod:`.write_ephys` (Neuropixels NWB 2), :mod:`.write_ophys_nwb2`
(DANDI 000728 NWB 2), :mod:`.write_ophys_nwb1` (Allen NWB 1.0.5 via h5py), :mod:`.corpus`
(``synthesize`` and the ``python -m ingest synth`` command), :mod:`.ideal` and :mod:`.ideal_ophys`
(the ideal observer on a store built from the corpus).
"""

from ingest.synth.corpus import synthesize
from ingest.synth.generative import SessionTruth, SynthConfig, bayes_accuracy

__all__ = ["synthesize", "SynthConfig", "SessionTruth", "bayes_accuracy"]
