"""The A/B experiment and its rollout: the user's `spec` and the controller's `state` (two models, one
file), the experiment `file` and its follower, `counts` and their sources (this process, replicas'
/metrics, Prometheus), `gates` (on `kdcontract.sequential`), and the rollout `controller`
(its own process). May import `settings` and the plain helpers only: the controller reaches replicas
through their metrics and the experiment file, never through Triton or the serving code."""
