"""EVE: epistemic Q-learning with a diagonal Laplace posterior over all Q-network parameters
(Schmitt, Shawe-Taylor, van Hasselt, AAAI 2023), on the off-policy core.

config.py (EVEConfig), module.py (EVEModule), learner.py (EVELearner), env_runner.py (EVEEnvRunner),
algorithm.py (EVE), losses.py and exploration.py (the maths, framework-free).
"""
