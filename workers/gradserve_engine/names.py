"""Names the transforms give to the inputs and outputs they add to a graph.

Every one begins with `INTERNAL` ("%"), which no name from outside may begin with (graph
validation refuses it, and the SDK names inputs after parameters and outputs `out...`), so a
transform's names can never collide with a user's: a user's input called `seeds` or output
called `grad:x` stays theirs. Residual inputs are `%<value id>`.
"""

INTERNAL = "%"
GRAD = "%grad:"  # gradient outputs: %grad:<input name>
SEED = "%ct:"  # cotangent seed inputs: %ct:<output name>
TANGENT = "%tan:"  # tangent inputs and outputs: %tan:<input or output name>
SEEDS = "%seeds"  # a Jacobian's stacked seeds (the identity), one input


def jacobian_block(k: int) -> str:
    """The output holding the k-th (output, input) block of a Jacobian graph, in the order asked."""
    return f"%jac{k}"


def residual(vid: int) -> str:
    """The input of a backward graph that carries the forward graph's value %<vid>."""
    return f"%{vid}"


def fresh(name: str, taken: set[str]) -> str:
    """`name`, or `name` with more INTERNAL prefixed until it is not in `taken` (a transform of a
    graph that already carries a transform's names), added to `taken`."""
    while name in taken:
        name = INTERNAL + name
    taken.add(name)
    return name
