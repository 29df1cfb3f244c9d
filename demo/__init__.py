"""The bundled demo model: a toy-size gpt-oss really trained on synthetic harmony conversations.

`python -m demo.train` generates the data (`conversations`), trains the tokenizer (`bpe`), trains
the model (`training_model`) and writes the checkpoint to `demo/gpt-oss-demo/`;
`python -m demo.eval` measures it through the real server.
"""

from pathlib import Path

CHECKPOINT_DIR = Path(__file__).parent / "gpt-oss-demo"
