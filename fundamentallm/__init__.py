"""FundamentaLLM: character-level transformer language models, trained from scratch.

The package is plain Python: importing it starts nothing, configures no logging and
creates no directories. Heavy dependencies (pyarrow, Great Expectations, torch) are
imported by the modules that need them, not here.
"""

__version__ = "0.1.0"
