"""r1c.frontends"""
