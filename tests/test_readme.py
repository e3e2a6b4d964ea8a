"""The README's Python API example runs as written, on a tiny random Llama folder."""

import pathlib
import re

from ulskip_jax.testing import save_hf_model, save_tiny_tokenizer

README = pathlib.Path(__file__).parent.parent / "README.md"


def test_readme_python_example_runs(tmp_path):
  folder = tmp_path / "hf_folder"
  save_hf_model("llama", folder)
  save_tiny_tokenizer(folder)
  text = README.read_text()
  code = re.search(r"## Python API\n\n```python\n(.*?)```", text, re.S).group(1)
  code = code.replace("path/to/hf_folder", str(folder)).replace('"pruned_2x"',
                                                                 repr(str(tmp_path / "pruned")))
  namespace = {}
  exec(compile(code, "README.md", "exec"), namespace)
  assert namespace["full"].shape == namespace["fast"].shape
  assert len(namespace["ids"]) == 1
  assert (tmp_path / "pruned" / "config.json").exists()
