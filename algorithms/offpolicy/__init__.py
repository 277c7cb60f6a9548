"""The project's fast off-policy core (WPO, EVE): RLlib's interfaces, without RLlib's slow episode path.

Pure pieces (no RLlib): :class:`TensorReplay` (preallocated ring buffer, n-step returns on insert for
E parallel envs), :func:`nstep_targets` (reference n-step targets of one episode), :func:`updates_due`
(samples-per-insert bookkeeping), :func:`update_target_networks` (Polyak / hard copy).

RLlib pieces (import them from their modules; they import Ray):

- ``config.OffPolicySettings`` (pydantic; every shared setting's default, bounds and doc) and
  ``config.OffPolicyConfig(AlgorithmConfig)``, whose defaults come from it: ``samples_per_insert``, ``replay_capacity``, ``n_step``,
  ``learning_starts``, ``max_updates_per_call``, ``target_update_period``, ``target_update_tau``,
  ``checkpoint_replay``, ``network`` (the spec's network block), ``replay_device``; RLlib's own
  ``train_batch_size_per_learner``, ``lr``, ``gamma``, ``grad_clip``, ``rollout_fragment_length``
  (vector steps per sample call), ``num_envs_per_env_runner``, ``num_env_runners``,
  ``min_sample_timesteps_per_iteration`` (iteration size), ``seed``.
- ``env_runner.VectorEnvRunner(EnvRunner)``: steps E gymnasium envs, returns numpy arrays [T, E, ...],
  seeded per episode, Checkpointable (restores mid-episode envs by replaying the episode's actions).
- ``module.OffPolicyRLModule(TorchRLModule, TargetNetworkAPI, InferenceOnlyAPI)``.
- ``learner.OffPolicyLearner(NetworkLearnerMixin, TorchLearner)``: owns the replay; ``insert``,
  ``run_updates``, ``reduce_stats``.
- ``algorithm.OffPolicyAlgorithm(Algorithm)``: the training_step loop, counters, checkpoint state.

Extension API: a new algorithm (WPO in ``algorithms/wpo``, EVE in ``algorithms/eve``) is a settings model
and four classes; the model, the config and the algorithm share ``config.py`` (as RLlib keeps PPO beside
PPOConfig).

1. Settings and config::

       class MySettings(OffPolicySettings):            # pydantic: each setting once
           MODULE_KEYS: ClassVar[tuple[str, ...]] = ("my_width",)   # what the module reads
           my_setting: float = Field(1.0, gt=0)
           "One-line doc (``orchestra validate --settings MY`` prints it)."
           my_width: int = Field(64, ge=1)
           "Hidden width of my network."
           lr: LearningRate = 1e-3                     # a core setting with another default

       class MyConfig(OffPolicyConfig):
           SETTINGS = MySettings       # defaults, training(**kw) keywords and validate() come from it
           def __init__(self, algo_class=None):
               super().__init__(algo_class=algo_class or MyAlgorithm)
           def get_default_rl_module_spec(self): return RLModuleSpec(module_class=MyModule)
           def get_default_learner_class(self): return MyLearner

   ``validate()`` checks every field through the model (a bad value raises
   :class:`algorithms.settings.SettingError`, which the spec checker reports as ``config.<key>: got ...;
   allowed: ...``); override it only for rules between settings or on the env's spaces.

2. Module (``OffPolicyRLModule``): build networks in ``setup()`` with ``algorithms.networks``
   (``self.network_config`` is the spec's block or None; ``MySettings.module_config(self.model_config)``
   gives the ``MODULE_KEYS`` settings, each at the model's default when the auto-includes lack it);
   declare ``TARGET_NETWORKS = ("q",)`` (frozen copies ``target_q`` made by the learner) and
   ``LEARNER_ONLY`` (attributes env runners do not need); implement
   ``act(obs [E, ...], *, explore, generator) -> actions [E, ...]`` (all randomness from
   ``generator``) and ``_forward(batch)``. State that acting needs (e.g. a diagonal Fisher) can be a
   registered buffer: it reaches the env runners with every weight sync.

3. Learner (``OffPolicyLearner``): implement
   ``compute_loss_for_module(*, module_id, config, batch, fwd_out) -> Tensor`` where ``batch`` holds the
   replay fields (``obs, action, reward, next_obs, terminated, truncated, nstep_return,
   bootstrap_obs, bootstrap_discount, nstep, index``; the TD target is
   ``nstep_return + bootstrap_discount · V(bootstrap_obs)``). Report statistics with
   ``self.record(module_id, name=scalar_tensor, ...)`` (iteration means appear as
   ``learners/<module>/<name>``, i.e. ``learner/<name>``). Use ``self.generator`` for randomness.
   Several optimisers: override ``configure_optimizers_for_module`` (each is clipped separately to
   ``grad_clip``). Hooks after each update: override ``run_updates`` or ``after_gradient_based_update``.

4. Algorithm (in config.py, after MyConfig): ``class MyAlgorithm(OffPolicyAlgorithm)`` with
   ``get_default_config = classmethod(lambda cls: MyConfig(cls))``; register it with
   ``register_algorithm("MY", "algorithms.my.config:MyAlgorithm")`` in ``algorithms/plugins.py``.

Env runner hooks (subclass ``VectorEnvRunner`` and set ``config.env_runner_cls``):
``on_episode_start(env_indices)`` (e.g. draw a new parameter perturbation per episode from
``self.generator``), ``on_weights_set()``, ``compute_actions(obs, explore)``,
``extra_state()`` / ``set_extra_state(state)`` (checkpointed with the sampler state).
"""

from algorithms.offpolicy.nstep import nstep_targets
from algorithms.offpolicy.ratio import updates_due
from algorithms.offpolicy.replay import FIELDS, TensorReplay

__all__ = ["FIELDS", "TensorReplay", "nstep_targets", "update_target_networks", "updates_due"]


def __getattr__(name: str):
    if name == "update_target_networks":
        from algorithms.offpolicy.module import update_target_networks

        return update_target_networks
    raise AttributeError(f"module 'algorithms.offpolicy' has no attribute {name!r}")
