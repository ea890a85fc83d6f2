"""RestoreLCC: capture, lost components, probes, compensation, training and fold (`steps` runs them in memory),
and the resumable job folder (`pipeline`).

This package is also the verb: `lcc_jax.restore(dense, pruned, tokenizer, config=None, *, mesh=None, **overrides)`
is `lcc_jax.api.restore` and returns a `RestoreResult`. The package is made callable instead of being shadowed by
a function of the same name, so `lcc_jax.restore.pipeline` and `import lcc_jax.restore.steps as steps` still work.
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, dense, pruned, tokenizer, config=None, *, mesh=None, **overrides):
        """RestoreLCC in memory (`lcc_jax.api.restore`): returns a RestoreResult."""
        from lcc_jax.api import restore

        return restore(dense, pruned, tokenizer, config, mesh=mesh, **overrides)


sys.modules[__name__].__class__ = _CallablePackage
