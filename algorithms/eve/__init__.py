"""EVE: epistemic Q-learning with a diagonal Laplace posterior over all Q-network parameters
(Schmitt, Shawe-Taylor, van Hasselt, AAAI 2023), on the off-policy core.

config.py (EVESettings, EVEConfig and the Algorithm EVE), module.py (EVEModule), learner.py (EVELearner),
env_runner.py (EVEEnvRunner), losses.py and exploration.py (the maths, framework-free); algorithm.py only
keeps old checkpoints' import path of EVE.
"""
