"""The application: the `jprune` command (`cli`), its jobs (`job`: train dense, prune, fine-tune, report; sweep
and sensitivity through `jprune.analysis`), the training loop with resumable checkpoints (`train`) and the
datasets it reads (`data`). Built on the library (`jprune` itself); the library never imports from here.

Needs the `app` extra (`pip install "jprune[app]"`): orbax-checkpoint, tensorflow-datasets, matplotlib, tqdm.
"""
