"""r1c.backends.tpu"""
