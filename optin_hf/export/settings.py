"""The export's defaults, apart from the heavy export code so that the CLI's parser can show them."""

DEFAULT_OPSET = 17
OPSETS = range(14, 21)  # 14: the first with scaled_dot_product_attention; 20: the TorchScript exporter's last
ATOL, RTOL = 1e-4, 1e-3  # |ort - torch| <= ATOL + RTOL * |torch|, element-wise, in float32
LATENCY_BATCH_SIZES = (1, 32)
