"""r1c.backends.cuda"""
