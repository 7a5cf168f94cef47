"""raee: retrieval-augmented early exit.

Shape letters used in comments across the code base:
    B  batch of texts            T  tokens per text          H  hidden size
    V  vocabulary size           L  number of blocks (layers 0..L, 0 = embedding output)
    C  number of classes (label words)                       K  neighbours retrieved per query
    N  number of queries or records
"""

__version__ = "0.1.0"
