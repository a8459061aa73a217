"""r1c.backends.cpu"""
