"""What runs on the controller: plan files, inventories, deploy, autodeploy, calibration, failover, local nodes."""
