"""r1c.backends"""
