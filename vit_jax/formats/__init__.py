"""On-disk formats shared by `checkpoints` (reading) and `convert` (writing): timm and Hugging Face
directories. Generic: the family descriptors own the key maps; these modules own the files."""
