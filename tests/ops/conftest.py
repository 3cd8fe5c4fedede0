# The inputs are tiny: one intra-op thread for every test here (helpers' module-scoped autouse fixture).
from helpers import one_intra_op_thread  # noqa: F401
