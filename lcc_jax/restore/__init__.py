"""RestoreLCC: capture, lost components, probes, compensation and fold (`steps` runs them in memory), and the
resumable job folder (`pipeline`).

This package is also the verb: `lcc_jax.restore(dense, pruned, tokenizer, config=None, *, mesh=None, **overrides)`
is `lcc_jax.restore.steps.restore` and returns a `RestoreResult`. The package is made callable instead of being
shadowed by a function of the same name, so `lcc_jax.restore.pipeline` and `import lcc_jax.restore.steps as steps`
still work.
"""

import sys
import types

from lcc_jax.restore.steps import RestoreResult
from lcc_jax.restore.steps import restore as _restore


class _CallablePackage(types.ModuleType):
    def __call__(self, dense, pruned, tokenizer, config=None, *, mesh=None, **overrides) -> RestoreResult:
        """RestoreLCC in memory (`lcc_jax.restore.steps.restore`): returns a RestoreResult."""
        return _restore(dense, pruned, tokenizer, config, mesh=mesh, **overrides)


sys.modules[__name__].__class__ = _CallablePackage
