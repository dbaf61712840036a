"""A small llama GGUF file cut from the shipped SmolLM2-135M Q4_1 file, for quick runs."""

from pathlib import Path

import gguf

from experiments.models.loading import smollm2_gguf_path


def smollm2_first_layers(path: Path, layers: int) -> Path:
    """Writes SmolLM2's metadata, tokenizer, embedding and first ``layers`` blocks to ``path``.

    Args:
      path: the ``.gguf`` file to write.
      layers: how many decoder blocks to keep (``llama.block_count`` says so).

    Returns:
      ``path``; its tensors are the shipped file's bytes, in their own types (Q4_1, Q8_0, F32).
    """
    reader = gguf.GGUFReader(smollm2_gguf_path())
    writer = gguf.GGUFWriter(path, "llama")
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue  # the writer adds them
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        value = layers if field.name == "llama.block_count" else field.contents()
        writer.add_key_value(field.name, value, kind, sub_type=sub)
    kept = [
        t
        for t in reader.tensors
        if not t.name.startswith("blk.") or int(t.name.split(".")[1]) < layers
    ]
    for tensor in kept:
        writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
