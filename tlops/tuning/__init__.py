"""`tlops tune`: an Optuna study over params.yaml's tune.space (flows/tune.py drives it).

space: the searched keys as Optuna distributions and a trial's values as params changes; study: the study's
storage, sampler and pruner; pruning: what a pipeline trial's fine-tuning stage reports per epoch (and where it
stops when the pruner says so).
"""
