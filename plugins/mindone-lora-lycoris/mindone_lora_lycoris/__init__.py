"""mindone-lora plugin: LyCORIS's LoHa and LoKr adapter algorithms (``--lora_algo loha|lokr``)."""

__version__ = "0.1.0"
