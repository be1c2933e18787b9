__version__ = "0.1.0"
DSL_VERSION = "4.8.1"   # the exact nvidia-cutlass-dsl every template is written and checked against
