"""Names the transforms give to the inputs and outputs they add to a graph."""

GRAD = "grad:"  # gradient outputs: grad:<input name>
SEED = "ct:"  # cotangent seed inputs: ct:<output name>
TANGENT = "tan:"  # tangent inputs and outputs: tan:<input or output name>
