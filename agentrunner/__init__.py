"""The Django project. Importing it loads nothing else: the Celery app (``agentrunner.celery``) is
loaded by ``AgentRunnerConfig.ready()``, and ``celery -A agentrunner`` finds it by that module name."""
